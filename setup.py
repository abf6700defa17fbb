"""Package discovery, which pyproject.toml cannot express for this layout: every package under src/ is found
automatically, and the Hydra config tree at the repository root (conf/) ships as the package fewshot.conf."""

from setuptools import find_packages, setup

setup(
    packages=find_packages("src") + ["fewshot.conf"],
    package_dir={"": "src", "fewshot.conf": "conf"},
)
