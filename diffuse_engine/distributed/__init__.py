"""Tensor parallelism on torch.distributed: one model over several GPUs, or several CPU processes.

- :mod:`.sharding`: which slice of each weight a rank holds (:class:`ShardPlan`) and the settings' checks;
- :mod:`.context`: a rank's collectives and the model's entry points under tensor parallelism (:class:`TPContext`);
- :mod:`.channel`: rank 0's commands to the other ranks;
- :mod:`.worker`: a rank other than 0;
- :mod:`.launch`: starting and stopping the ranks (:func:`launch`, :class:`TPRuntime`), spawned by the engine or
  by ``torchrun``.
"""

from .context import TPContext
from .launch import DISTRIBUTED_INIT, TPRuntime, launch
from .sharding import ShardPlan, check_tensor_parallel

__all__ = ["DISTRIBUTED_INIT", "ShardPlan", "TPContext", "TPRuntime", "check_tensor_parallel", "launch"]
