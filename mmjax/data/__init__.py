"""mmjax input: webdataset streaming, decoding, tokenizers, built-in data, shard writer."""
from mmjax.data.batch import make_global_batch
from mmjax.data.decode import decode_and_crop, normalize_on_device
from mmjax.data.pipeline import (DataError, DataIterator, build_eval_iterator,
                                 build_train_iterator, default_data_config)
from mmjax.data.sources import expand_shards
from mmjax.data.tokenizers import build_tokenizer

__all__ = ["make_global_batch", "decode_and_crop", "normalize_on_device", "DataError",
           "DataIterator", "build_eval_iterator", "build_train_iterator", "default_data_config",
           "expand_shards", "build_tokenizer"]
