# The benchmark's init-heavy start-up (passed as `python3 -c`, warm-up in
# seconds as its argument): import a large module set (stdlib and Debian's
# python3-* libraries in the debian-python fixture), spend the warm-up,
# then, under Ember's readiness protocol (EMBER_READY_FD, see
# docs/agent-protocol.md), say `ready` and wait for the run's JSON line.
# Every run prints one random 64-bit value: a restored copy re-seeds
# `random` from the seed the line carries, so copies do not repeat.
import asyncio, concurrent.futures, csv, dataclasses, datetime, decimal, difflib
import email, email.mime.multipart, email.mime.text, email.parser, fractions, gzip
import hashlib, http.client, http.cookies, http.server, inspect, ipaddress, json
import logging, logging.handlers, multiprocessing, pathlib, pickle, pydoc, random
import re, sqlite3, ssl, statistics, string, subprocess, tarfile, tempfile, textwrap
import threading, tomllib, typing, unittest, urllib.request, uuid, xml.dom.minidom
import xml.etree.ElementTree, xml.sax, zipfile, zoneinfo
import numpy, yaml, requests, jinja2
import os, sys, time

time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 1.0)
fd = os.environ.get("EMBER_READY_FD")
if fd:
    fd = int(fd)
    os.write(fd, b"ready\n")
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        line += chunk
    random.seed(json.loads(line)["seed"])
print("%016x" % random.getrandbits(64), flush=True)
