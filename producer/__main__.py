"""``python -m producer`` = the ``slip`` console command."""

from producer.cli import main

main()
