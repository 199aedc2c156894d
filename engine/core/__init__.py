"""The engine in a process of its own (`EngineProcess`): its own GIL for the step loop.

`process.py` is the front end a replica holds (the `Engine` API, streams fed by one
reader thread); `child.py` runs a real `Engine` in the spawned process;
`messages.py` is what travels between them over one `multiprocessing` pipe.
"""

from engine.core.messages import DeferredInputs
from engine.core.process import EngineProcess

__all__ = ["DeferredInputs", "EngineProcess"]
