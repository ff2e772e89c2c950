"""HRNet classification models (``build_model``) and their cost (``summarize``)."""
from hrnet.model.hrnet import build_model, check_input_size, fold_batch_norm
from hrnet.model.summary import count_macs, count_params, summarize

__all__ = ["build_model", "check_input_size", "fold_batch_norm", "count_params", "count_macs", "summarize"]
