"""CPU kernels compiled with numba: each fuses what the torch reference does in tens of eager ops.

The torch versions beside them (``kernels/philox.py``, ``kernels/vote.py``, DELLA's ranks in the
task-vector method) stay the reference and the fallback; every kernel here is tested bit for bit
against its reference.  Imported lazily through ``kernels.dispatch``: numba's import and the first
compile cost about a second, which a run that never needs them should not pay.
"""
