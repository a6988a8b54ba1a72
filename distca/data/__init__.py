"""Training data: synthetic documents from a length distribution, or local text files,
tokenized and packed into :class:`~distca.batch.PackedBatch` micro-batches.

``make_dataset(cfg)`` is the entry point; ``dataset.step_batches(step)`` returns the step's
micro-batches, a pure function of ``(seed, step)``.
"""

from distca.data.dataset import Dataset, make_dataset
from distca.data.lengths import LengthSampler, read_lengths_file
from distca.data.packing import pack
from distca.data.synthetic import SyntheticData
from distca.data.text import TextData, read_documents
from distca.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = ["ByteTokenizer", "Dataset", "HFTokenizer", "LengthSampler", "SyntheticData",
           "TextData", "load_tokenizer", "make_dataset", "pack", "read_documents",
           "read_lengths_file"]
