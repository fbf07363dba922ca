import sys

from gptoss_tune.train.trainer import main

sys.exit(main())
