"""Calibration and training data: read text, or sample it from the teacher, then pack it into blocks.

    from linearize.data import build_calibration
    calib = build_calibration(tok, source="shared/data/train-text/alpaca-cleaned", n_tokens=100_000, seq_len=512,
                              model=model)
    calib.train.shape, calib.valid.shape   # (196, 512), (10, 512): shuffled, disjoint blocks
    calib = build_calibration(tok, source=None, model=model, n_tokens=100_000, seq_len=512)  # data-free

One module per concern: ``records`` (file formats, HF datasets, instruction/chat records -> text), ``sampling``
(the teacher writes its own text, resumably), ``packing`` (tokenize, pack, shuffle, split).
"""

from linearize.data.packing import CalibrationData, build_calibration
from linearize.data.records import read_chat_texts, read_texts, record_to_messages, record_to_text
from linearize.data.sampling import sample_teacher_tokens

__all__ = ["CalibrationData", "build_calibration", "read_chat_texts", "read_texts", "record_to_messages",
           "record_to_text", "sample_teacher_tokens"]
