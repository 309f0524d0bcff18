"""`emorl evaluate` as a script, for `ray job submit -- python jobs/evaluate.py ...` (the job's working
directory is on its PYTHONPATH) and for a checkout with the package installed. See
emorl_ray/cli/evaluate.py for what it does and its options."""

import sys

from emorl_ray.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
