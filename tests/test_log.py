"""
pilot.log: text and JSON-lines observers, level filtering, and the twistd
logger factories.
"""

from __future__ import annotations

import io
import json
import os

from twisted.logger import LogLevel, Logger, eventsFromJSONLogFile, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from pilot import log


def emit(observer: object, level: LogLevel = LogLevel.info, **fields: object) -> None:
    Logger(namespace="pilot.test", observer=observer).emit(  # type: ignore[arg-type]
        level, "punch to {peer} gave up after {attempts}", **{"peer": "1:0000.0000.0005", "attempts": 3, **fields})


class ObserverTests(SynchronousTestCase):
    def test_text(self) -> None:
        stream = io.StringIO()
        emit(log.make_observer("text", stream))
        line = stream.getvalue()
        self.assertTrue(line.endswith("[pilot.test#info] punch to 1:0000.0000.0005 gave up after 3\n"), line)

    def test_json_lines(self) -> None:
        stream = io.StringIO()
        observer = log.make_observer("json", stream)
        emit(observer)
        emit(observer, attempts=4)
        lines = stream.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        first = json.loads(lines[0])  # one plain JSON object per line
        self.assertEqual((first["peer"], first["attempts"]), ("1:0000.0000.0005", 3))
        self.assertEqual(first["log_format"], "punch to {peer} gave up after {attempts}")
        self.assertEqual(first["log_level"]["name"], "info")
        events = list(eventsFromJSONLogFile(io.StringIO(stream.getvalue())))
        self.assertEqual([formatEvent(e) for e in events],
                         ["punch to 1:0000.0000.0005 gave up after 3", "punch to 1:0000.0000.0005 gave up after 4"])

    def test_level_filter(self) -> None:
        stream = io.StringIO()
        observer = log.make_observer("json", stream, "warn")
        emit(observer, LogLevel.debug)
        emit(observer, LogLevel.info)
        emit(observer, LogLevel.warn)
        emit(observer, LogLevel.error)
        levels = [json.loads(line)["log_level"]["name"] for line in stream.getvalue().splitlines()]
        self.assertEqual(levels, ["warn", "error"])

    def test_debug_shows_debug(self) -> None:
        stream = io.StringIO()
        emit(log.make_observer("text", stream, LogLevel.debug), LogLevel.debug)
        self.assertIn("#debug]", stream.getvalue())

    def test_names(self) -> None:
        self.assertEqual(log.check_format(" JSON "), "json")
        self.assertEqual(log.parse_level("WARNING"), LogLevel.warn)
        self.assertEqual(log.level_name("Error"), "error")
        self.assertIn("text, json", str(self.assertRaises(ValueError, log.check_format, "xml")))
        self.assertIn("debug, info", str(self.assertRaises(ValueError, log.parse_level, "loud")))
        self.assertRaises(ValueError, log.make_observer, "yaml", io.StringIO())


class TwistdLoggerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.patch(log, "_twistd_choice", None)
        self.path = os.path.abspath(self.mktemp())

    def read(self) -> list[dict[str, object]]:
        with open(self.path) as f:
            return [json.loads(line) for line in f]

    def test_choice_to_file(self) -> None:
        self.assertEqual(log.choose_for_twistd("json", "warn", self.path, False), "pilot.log.twistd_logger")
        observer = log.twistd_logger()
        emit(observer, LogLevel.info)
        emit(observer, LogLevel.error)
        self.assertEqual([e["log_level"]["name"] for e in self.read()], ["error"])  # type: ignore[index]

    def test_daemon_default_file(self) -> None:
        log.choose_for_twistd("text", "info", None, nodaemon=False)
        self.assertEqual(log._twistd_choice, log._TwistdChoice("text", "info", "twistd.log"))
        log.choose_for_twistd("text", "info", None, nodaemon=True)
        self.assertEqual(log._twistd_choice, log._TwistdChoice("text", "info", None))

    def test_json_logger_environment(self) -> None:
        self.patch(os, "environ", {**os.environ, "PILOT_LOG_FILE": self.path, "PILOT_LOG_LEVEL": "error"})
        observer = log.json_logger()
        emit(observer, LogLevel.warn)
        emit(observer, LogLevel.critical)
        self.assertEqual([e["log_level"]["name"] for e in self.read()], ["critical"])  # type: ignore[index]
