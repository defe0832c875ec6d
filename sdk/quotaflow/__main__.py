import sys

from quotaflow.cli import main

sys.exit(main())
