"""Where a run's process groups meet: a torch `TCPStore` that listens on one address, its keys under a run secret.

Choices:
1) The master store listens on the one address its peers use: loopback when the Ray cluster is this one node (every
   actor runs here), else this node's IP (Ray's), never every interface. torch's own store server binds to all
   interfaces, so the master opens the listening socket itself and hands it over (`master_listen_fd`).
2) Every key lives under a random prefix (`new_secret`) that the master's process makes and Ray carries to each peer
   with the address. A process that reaches the port without it (a stale rank of an earlier run on a reused port, a
   stray client) neither finds nor overwrites the group's keys by name. The prefix is not access control: any client
   of a TCPStore can list its keys, so on several nodes the node network must be as trusted as Ray's own ports.
"""
from __future__ import annotations

import secrets
import socket
from datetime import timedelta

import torch.distributed as dist

LOOPBACK = "127.0.0.1"
TIMEOUT = timedelta(minutes=10)  # every rank must reach the store within it (engines may still be loading)


def meeting_host(alive_nodes: int, node_ip: str) -> str:
    """The address a group's master listens on: loopback when the cluster is one node, else the node's IP."""
    return LOOPBACK if alive_nodes == 1 else node_ip


def new_secret() -> str:
    """The prefix of one group's keys, passed to its peers through Ray."""
    return secrets.token_hex(16)


def free_port(host: str) -> int:
    """A port free on `host` now, for the master to listen on moments later."""
    with socket.socket(_family(host)) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def open_store(host: str, port: int, rank: int, world_size: int, secret: str,
               timeout: timedelta = TIMEOUT) -> dist.Store:
    """The group's store as rank `rank` sees it: rank 0 hosts it on (`host`, `port`) only, every rank reaches it
    there, and keys are read and written under `secret`."""
    listen_fd = _listen(host, port) if rank == 0 else None
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout, master_listen_fd=listen_fd)
    return dist.PrefixStore(secret, store)


def _listen(host: str, port: int) -> int:
    """A socket listening on (`host`, `port`) alone; the store owns (and closes) its descriptor from here."""
    sock = socket.socket(_family(host))
    try:
        # as torch's own server: a port whose earlier connections linger in TIME_WAIT is free to listen on
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen()
    except OSError:
        sock.close()
        raise
    return sock.detach()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
