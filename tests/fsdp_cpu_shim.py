"""Test harness only: run the negkd CLI with accelerate's FSDP2 path switched on under CPU/gloo.

accelerate (1.x) enables FSDP only on accelerator devices: under ``ACCELERATE_USE_CPU=1`` an FSDP
config is ignored and the run is plain DDP (DistributedType.MULTI_CPU). torch's ``fully_shard``
itself runs on CPU over gloo, so this shim flips the accelerator state to FSDP after accelerate
has set up the CPU process group; everything after that (prepare, no_sync, clip, save/load
state, unwrap) is accelerate's real FSDP2 code. Usage:
``accelerate launch --config_file fsdp.yaml tests/fsdp_cpu_shim.py train-neg ...``
"""

import os
import sys

import accelerate.accelerator as _acc
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = _acc.Accelerator.__init__


def _init_fsdp(self, *a, **k):
    _init(self, *a, **k)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and self.num_processes > 1:
        self.state.distributed_type = DistributedType.FSDP
        PartialState().distributed_type = DistributedType.FSDP  # AcceleratorState re-reads it
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin()


_acc.Accelerator.__init__ = _init_fsdp

if __name__ == "__main__":
    from negkd.cli import app

    sys.exit(app(sys.argv[1:]))
