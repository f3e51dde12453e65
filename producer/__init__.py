"""The SLIP queue producer: the Python client (:mod:`producer.client`) and the ``slip`` CLI."""
