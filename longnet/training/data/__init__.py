"""Byte-level data for the LongNet language model.

* :mod:`.corpus`: corpora on disk (built-in stdlib sources, enwik8, text), split and cached;
* :mod:`.sampling`: random training windows with a resumable state, evaluation windows;
* :mod:`.documents`: whole documents packed into training rows (``train.pack_documents``);
* :mod:`.passkey`: the synthetic passkey-retrieval task.
"""

from .corpus import (ENWIK8_SIZE, ENWIK8_URL, VOCAB_SIZE, Corpus, LongNetDataError, default_cache_dir, open_builtin,
                     open_corpus, open_enwik8, open_text)
from .documents import DocumentSampler, document_start_loss, document_starts
from .passkey import DEFAULT_ANSWER_WEIGHT, PasskeyTask, passkey_accuracy, passkey_digit_accuracy
from .sampling import RandomWindowSampler, check_sampler_state, iter_eval_windows, num_eval_windows

__all__ = ["LongNetDataError", "Corpus", "open_corpus", "open_builtin", "open_enwik8", "open_text",
           "default_cache_dir", "RandomWindowSampler", "DocumentSampler", "document_starts", "document_start_loss", "iter_eval_windows", "num_eval_windows",
           "PasskeyTask", "passkey_accuracy", "passkey_digit_accuracy", "check_sampler_state",
           "DEFAULT_ANSWER_WEIGHT", "ENWIK8_URL", "ENWIK8_SIZE", "VOCAB_SIZE"]
