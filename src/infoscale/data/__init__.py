"""Text in, tokens out: corpora, tokenizers and windows."""

from .bpe import BPETokenizer, load_tokenizer
from .corpora import CORPORA, Document, load_corpus, split_documents
from .tokenizers import MASK, PAD, SPECIALS, UNK, CharTokenizer
from .windows import TokenDocs, make_windows

__all__ = ["CORPORA", "Document", "load_corpus", "split_documents", "MASK", "PAD", "SPECIALS", "UNK", "CharTokenizer",
           "TokenDocs", "make_windows",
           "BPETokenizer", "load_tokenizer"]
