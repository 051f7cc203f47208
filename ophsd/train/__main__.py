import sys

from ophsd.train.main import main

sys.exit(main())
