// Node `ws` peer for bench/run.sh. GET /echo echoes every message; GET /chat/{room} sends every
// message to everyone in the room, sender included. Usage: node server.js PORT
'use strict';
const http = require('http');
const { WebSocketServer } = require('ws');

const port = Number(process.argv[2] || 9002);
const server = http.createServer((req, res) => { res.writeHead(404); res.end(); });
const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false });
const rooms = new Map();

server.on('upgrade', (req, socket, head) => {
  const path = req.url.split('?')[0];
  let room = null;
  if (path.startsWith('/chat/') && path.length > 6) room = decodeURIComponent(path.slice(6));
  else if (path !== '/echo') { socket.destroy(); return; }
  wss.handleUpgrade(req, socket, head, (ws) => {
    if (room === null) {
      ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
      return;
    }
    let members = rooms.get(room);
    if (!members) { members = new Set(); rooms.set(room, members); }
    members.add(ws);
    ws.on('message', (data, isBinary) => {
      for (const peer of members) if (peer.readyState === 1) peer.send(data, { binary: isBinary });
    });
    ws.on('close', () => {
      members.delete(ws);
      if (members.size === 0) rooms.delete(room);
    });
  });
});
server.listen(port, '127.0.0.1', () => console.error(`node-ws listening on 127.0.0.1:${port}`));
