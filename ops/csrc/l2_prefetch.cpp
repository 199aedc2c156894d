// The L2-prefetch switch (l2_prefetch.h); in the C++ sources so Python can always set it.
#include "l2_prefetch.h"

#include "launch_switch.h"

// Off until its GPU tests and bench (bench/gpu_i18.sh pf-test pf-bench) have run on a device; =1 turns it on.
SPLITVL_LAUNCH_SWITCH(l2_prefetch, "SPLITVL_L2_PREFETCH", false)
