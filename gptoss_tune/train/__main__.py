"""`accelerate launch -m gptoss_tune.train RECIPE [key=value ...]` (the launcher; the verb is gptoss_tune.cli.train)."""

import sys

from gptoss_tune.cli.main import train_main

sys.exit(train_main())
