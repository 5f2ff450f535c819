"""FastAPI + uvicorn peer for bench/run.sh.

GET /echo echoes every message; GET /chat/{room} sends every message to everyone in the room,
sender included. Run: uvicorn app:app --host 127.0.0.1 --port PORT (uvloop + httptools +
websockets, one worker).
"""

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

app = FastAPI()
rooms: dict[str, set[WebSocket]] = {}


@app.websocket("/echo")
async def echo(ws: WebSocket) -> None:
    await ws.accept()
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await ws.send_text(message["text"])
            elif message.get("bytes") is not None:
                await ws.send_bytes(message["bytes"])
    except WebSocketDisconnect:
        return


@app.websocket("/chat/{room}")
async def chat(ws: WebSocket, room: str) -> None:
    await ws.accept()
    members = rooms.setdefault(room, set())
    members.add(ws)
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text, data = message.get("text"), message.get("bytes")
            for peer in list(members):
                try:
                    if text is not None:
                        await peer.send_text(text)
                    elif data is not None:
                        await peer.send_bytes(data)
                except Exception:
                    members.discard(peer)
    except WebSocketDisconnect:
        return
    finally:
        members.discard(ws)
        if not members:
            rooms.pop(room, None)
