"""sinklab data: corpus -> byte-level BPE -> memmap token shards -> deterministic batches
(or the synthetic Bigram-Backcopy task, generated fresh per step)."""
import warnings

from .config import DataConfig
from .loader import BatchLoader, TokenSplit, make_loader
from .prepare import prepare
from .sources import load_documents
from .tokenizer import load_tokenizer, train_tokenizer

# `python -m data.prepare` runs a module this package already imported; that is harmless here.
warnings.filterwarnings("ignore", message="'data.prepare' found in sys.modules", category=RuntimeWarning)

__all__ = ["BatchLoader", "DataConfig", "TokenSplit", "load_documents", "load_tokenizer", "make_loader", "prepare",
           "train_tokenizer"]
