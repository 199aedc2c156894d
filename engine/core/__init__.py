"""The engine in a process of its own (`EngineProcess`): its own GIL for the step loop.

`process.py` is the front end a replica holds (the `Engine` API, streams fed by one
reader thread); `child.py` runs a real `Engine` in the spawned process;
`messages.py` is what travels between them over one `multiprocessing` pipe; `ray_link.py`
is how a TP > 1 engine process joins the replica's Ray cluster.
"""

from engine.core.messages import DeferredInputs
from engine.core.process import EngineProcess
from engine.core.ray_link import RayLink

__all__ = ["DeferredInputs", "EngineProcess", "RayLink"]
