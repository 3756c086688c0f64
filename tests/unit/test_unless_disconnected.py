"""`server.streaming.unless_disconnected`, the one race every non-streaming route (/generate, /v1, /classify) runs
between its answer and the client going away."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from server.errors import ClientDisconnectedError
from server.streaming import unless_disconnected


def receiver(disconnect: asyncio.Event) -> Any:
    async def receive() -> dict[str, str]:
        await disconnect.wait()
        return {"type": "http.disconnect"}
    return receive


def test_a_disconnect_first_cancels_the_work_and_abandons_it() -> None:
    abandoned: list[bool] = []

    async def scenario() -> asyncio.Future[int]:
        work: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        disconnect = asyncio.Event()
        disconnect.set()
        with pytest.raises(ClientDisconnectedError):
            await unless_disconnected(work, receiver(disconnect), lambda: abandoned.append(True))
        return work

    work = asyncio.run(scenario())
    assert work.cancelled() and abandoned == [True]


def test_the_answer_first_is_returned_and_nothing_is_abandoned() -> None:
    abandoned: list[bool] = []

    async def scenario() -> int:
        work: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(work.set_result, 7)
        return await unless_disconnected(work, receiver(asyncio.Event()), lambda: abandoned.append(True))

    assert asyncio.run(scenario()) == 7 and abandoned == []
