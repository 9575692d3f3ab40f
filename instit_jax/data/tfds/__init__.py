"""TFDS builders for the Inst-IT release, prepared from a manual dir (needs ``tensorflow_datasets``, not
TensorFlow: the builders write ArrayRecord and are read with ``as_data_source``).

Importing this subpackage imports ``tensorflow_datasets`` and registers ``inst_it_dataset`` (configs
``image``, ``video``) and ``inst_it_bench`` (splits ``image``, ``video``); nothing else in ``instit_jax``
imports it. ``convert`` turns a prepared split into our annotation records / TFRecord shards. See docs/tfds.md.
"""

from instit_jax.data.tfds.inst_it_bench import InstItBench
from instit_jax.data.tfds.inst_it_dataset import InstItDataset
from instit_jax.data.tfds.manual import ManualDirError

__all__ = ["InstItBench", "InstItDataset", "ManualDirError"]
