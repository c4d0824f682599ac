"""loaders: everything before the model — conversion to .beton, loaders yielding `Batch`, batched transforms.

Nothing in this package imports `engine`.
"""
from loaders.batch import Batch  # noqa: F401
