"""hanorec.data: readers, images, posters, sequences/splits, protocols, pairs, prompts.

See docs/architecture.md ("Prepared data", "Prompts") for the on-disk contract.
"""

from hanorec.data.catalog import Catalog
from hanorec.data.config import DataConfig
from hanorec.data.errors import DataFileError
from hanorec.data.images import UnsafeImagePathError, safe_image_path
from hanorec.data.prepare import prepare
from hanorec.data.prompts import Prompt, build_prompt, response_text

__all__ = ["Catalog", "DataConfig", "DataFileError", "Prompt", "UnsafeImagePathError",
           "build_prompt", "prepare", "response_text", "safe_image_path"]
