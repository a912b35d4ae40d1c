import sys

from loadtest.capacity.driver import main

sys.exit(main())
