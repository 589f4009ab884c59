"""Reads one query's rows from a SQLite file with ADBC and writes them to stdout as an Arrow IPC stream.

It runs in a process of its own (``engine.crmread.arrow_batches`` starts it): the ADBC driver carries its own
copy of SQLite, and a second copy in the process that writes through Python's sqlite3 module reads stale rows
(seen here: a row updated and committed a moment before read as it was; SQLite's "How To Corrupt", 2.2.1,
warns against two copies in one process). A process of its own also reads while the exporter works on the rows
already read. It uses ADBC's low-level API: the DB-API module imports pandas, three times the start-up.

    python -m batchsync.engine.sqlitereader crm.sqlite < query.sql > rows.arrows
"""

from __future__ import annotations

import sys

import adbc_driver_manager
import adbc_driver_sqlite
import pyarrow as pa

BATCH_ROWS = 65_536  # the driver's default of 1024 costs a conversion each


def main(path: str) -> int:
    sql = sys.stdin.read()
    with (
        adbc_driver_sqlite.connect(path) as database,
        adbc_driver_manager.AdbcConnection(database) as connection,
        adbc_driver_manager.AdbcStatement(connection) as statement,
    ):
        statement.set_options(**{"adbc.sqlite.query.batch_rows": str(BATCH_ROWS)})
        statement.set_sql_query(sql)
        stream, _ = statement.execute_query()
        reader = pa.RecordBatchReader._import_from_c(stream.address)
        with pa.ipc.new_stream(sys.stdout.buffer, reader.schema) as output:
            for batch in reader:
                output.write_batch(batch)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
