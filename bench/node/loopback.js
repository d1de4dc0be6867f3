// Preloaded (node -r) into the localtunnel server and client by bench/run: a listening
// socket given no address is bound to 127.0.0.1 instead of every interface. The server's
// per-client tunnel agent calls listen() with no host; the bench stays on loopback.
'use strict';
const net = require('net');
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  const a0 = args[0];
  if (args.length === 0 || typeof a0 === 'function') {
    args.unshift(0, '127.0.0.1');
  } else if (typeof a0 === 'number' || (typeof a0 === 'string' && /^\d+$/.test(a0))) {
    if (typeof args[1] !== 'string') args.splice(1, 0, '127.0.0.1');
  } else if (a0 !== null && typeof a0 === 'object' && !a0.host && a0.path === undefined && !a0._handle && !a0.fd) {
    args[0] = { ...a0, host: '127.0.0.1' };
  }
  return listen.apply(this, args);
};
