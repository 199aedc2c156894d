// The sm_90a attention switch (attention_sm90.h); in the C++ sources so Python can always set it.
#include "attention_sm90.h"

#include "launch_switch.h"

SPLITVL_LAUNCH_SWITCH(attention_sm90, "SPLITVL_ATTN_SM90", false)  // slower than mma.sync so far
