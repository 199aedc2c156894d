// The L2-prefetch switch (l2_prefetch.h); in the C++ sources so Python can always set it.
#include "l2_prefetch.h"

#include "launch_switch.h"

// Off: not yet faster on a device (BENCHMARKS.md 18); =1 turns it on.
SPLITVL_LAUNCH_SWITCH(l2_prefetch, "SPLITVL_L2_PREFETCH", false)
