"""DB3KD's own methods (SD, BD, MBD, ZSDB3KD) and the label-only vote-kd. Importing this package registers them.

The baselines it is compared with live in the top-level ``baselines`` package.
"""

from db3kd.methods import decision_based  # noqa: F401  (registers db3kd-sd, db3kd-bd, db3kd-mbd)
from db3kd.methods import zero_shot  # noqa: F401,E402  (registers zsdb3kd)
from db3kd.methods import vote  # noqa: F401,E402  (registers vote-kd)
