"""The lock a thread holds while the process's global random generators must not move under another thread.

Views are drawn from python `random`, `numpy.random` and torch's generator (timm's transforms use the globals), so
a thread of the same process that draws from them meanwhile would change the views: botocore draws its retry
jitter from `random`. data.rng holds this lock for every seeded scope; a thread making object-store calls beside
view making (storage.lease's watcher) holds it for those calls.
"""

import os
import threading

GLOBAL_RNG_LOCK = threading.RLock()

# A process forked (a loader worker) while another thread held the lock would inherit it held by a thread it does not
# have, and wait forever at its first view: fork only while this thread holds it, then release it on both sides.
os.register_at_fork(before=GLOBAL_RNG_LOCK.acquire, after_in_parent=GLOBAL_RNG_LOCK.release,
                    after_in_child=GLOBAL_RNG_LOCK.release)
