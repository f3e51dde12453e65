"""``python -m producer`` = the ``slip`` console command."""

from producer.cli import main

if __name__ == "__main__":
    main()
