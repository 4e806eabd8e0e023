"""The one error type for bad data.

A `DataError` says what was wrong and where (file, row, id). The CLI prints it as one
paragraph and exits non-zero; programming errors still raise normally with a traceback.
"""


class DataError(Exception):
    """Bad input data: a file, row, id or split that cannot be used as it is."""

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)
