// Live connections per listener of one port (watch): see conns.h.
// bcc dialect, UAPI headers only.
#include <uapi/linux/bpf.h>
#include "conns.h"
