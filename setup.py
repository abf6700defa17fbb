"""Package discovery, which pyproject.toml cannot express for this layout: every package under src/ is found
automatically, and the Hydra config tree at the repository root (conf/) ships as the package fewshot.conf with its
YAML files, each of its folders (algo/, experiment/, ...) a package of its own, as Python sees them."""

from setuptools import find_namespace_packages, find_packages, setup

conf = ["fewshot.conf"] + [f"fewshot.conf.{p}" for p in find_namespace_packages("conf")]  # skips __pycache__
setup(
    packages=find_packages("src") + conf,
    package_dir={"": "src", "fewshot.conf": "conf"},
    package_data={p: ["*.yaml"] for p in conf},
)
