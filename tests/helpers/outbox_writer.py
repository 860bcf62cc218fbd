"""A database writer that dies right after its last COMMIT, so that a test can check that
the outbox kept every committed change's event.

Run as ``python outbox_writer.py DATABASE_URL TENANT PRODUCT COUNT``. It sets the stock of
the product to 1, 2, ... COUNT, one transaction each, through SQLAlchemy, and SIGKILLs
itself as soon as the last COMMIT has returned: no clean shutdown, no connection closed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine


async def write(url: str, tenant: str, product: int, count: int) -> None:
    engine = create_async_engine(url)
    for stock in range(1, count + 1):
        async with engine.begin() as connection:
            await connection.execute(
                text("UPDATE products SET stock = :stock WHERE tenant_id = :tenant AND id = :id"),
                {"stock": stock, "tenant": tenant, "id": product},
            )
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("tenant")
    parser.add_argument("product", type=int)
    parser.add_argument("count", type=int)
    arguments = parser.parse_args()
    asyncio.run(write(arguments.url, arguments.tenant, arguments.product, arguments.count))


if __name__ == "__main__":
    main()
