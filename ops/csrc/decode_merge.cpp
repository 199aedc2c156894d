// The paged decode merge switch (decode_merge.h); in the C++ sources so Python can always set it.
#include "decode_merge.h"

#include "launch_switch.h"

// Off: measured slower at batch 1 than the second launch it saves (BENCHMARKS.md 17.2); =1 turns it on.
SPLITVL_LAUNCH_SWITCH(decode_fused_merge, "SPLITVL_DECODE_FUSED_MERGE", false)
