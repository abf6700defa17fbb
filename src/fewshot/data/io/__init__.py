"""The data I/O layer under every dataset module: downloads, archive safety, restricted pickles, digests and
the decode cache. Dataset modules only parse their format and call these; nothing here knows a dataset.

- download: atomic md5-checked downloads; ``ensure_files`` (local files or one download, extracted safely)
- archives: zip/tar reading and extraction that refuse entries landing outside their folder (zip-slip)
- pickles: ``restricted_load``, an unpickler that rebuilds numpy arrays, dicts, lists and strings only
- hashing: ``file_hash`` and ``fingerprint``, the one scheme that names every cache file
- cache: ``cached``, read the cache for a fingerprint or decode, save atomically and log
- decode: ``fill_parallel``, the one thread pool for decoding, plus Lanczos resizing and the bank layout
- npz: ``npz_array``, an array of an .npz memory-mapped in place when stored uncompressed
"""

from fewshot.data.io.archives import check_zip_members, open_zip, safe_extract, safe_extract_archive
from fewshot.data.io.cache import STALE_TEMPORARY_SECONDS, cached, is_uint8_bank, read_cache, write_cache
from fewshot.data.io.decode import corrupt, decode_image, fill_parallel, resize_banks, resize_hwc, to_bank
from fewshot.data.io.download import download_all, download_file, ensure_files
from fewshot.data.io.hashing import file_hash, file_signature, fingerprint
from fewshot.data.io.npz import npz_array
from fewshot.data.io.pickles import RestrictedUnpickler, as_text, get_key, restricted_load

__all__ = [
    "STALE_TEMPORARY_SECONDS",
    "RestrictedUnpickler",
    "as_text",
    "cached",
    "check_zip_members",
    "corrupt",
    "decode_image",
    "download_all",
    "download_file",
    "ensure_files",
    "file_hash",
    "file_signature",
    "fill_parallel",
    "fingerprint",
    "get_key",
    "is_uint8_bank",
    "npz_array",
    "open_zip",
    "read_cache",
    "resize_banks",
    "resize_hwc",
    "restricted_load",
    "safe_extract",
    "safe_extract_archive",
    "to_bank",
    "write_cache",
]
