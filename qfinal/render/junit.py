"""JUnit XML as GitHub Actions and GitLab read it: one testcase per named check."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from ..atomic import write_text_atomic
from ..report import Report, Severity

_INVALID_XML = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd]")


def _xml_text(text: str) -> str:
    """Tensor names come from untrusted files: drop what XML 1.0 cannot carry."""
    return _INVALID_XML.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def to_junit(report: Report, fail_on: Severity = "error") -> str:
    checks = report.checks or sorted({f.check for f in report.findings})
    seconds = sum(s.seconds for s in report.stages)
    suite = ET.Element("testsuite", name=f"qfinal.{report.command}", tests=str(len(checks)),
                       time=f"{seconds:.3f}")
    failures = 0
    for check in checks:
        case = ET.SubElement(suite, "testcase", classname=f"qfinal.{report.command}", name=check)
        failing = report.check_status(check, fail_on)
        if failing:
            failures += 1
            first = failing[0]
            summary = (f"{len(failing)} finding(s); first: " + (f"{first.key}: " if first.key else "") +
                       first.message)
            failure = ET.SubElement(case, "failure", message=_xml_text(summary), type=check)
            failure.text = _xml_text("\n".join(f"[{f.severity}] {f.key or '-'}: {f.message}" for f in failing))
        infos = [f for f in report.findings if f.check == check and f not in failing]
        if infos:
            out = ET.SubElement(case, "system-out")
            out.text = _xml_text("\n".join(f"[{f.severity}] {f.key or '-'}: {f.message}" for f in infos))
    suite.set("failures", str(failures))
    suite.set("errors", "0")
    suites = ET.Element("testsuites", name="qfinal", tests=str(len(checks)), failures=str(failures))
    suites.append(suite)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def write_junit(report: Report, path: Path, fail_on: Severity = "error") -> None:
    write_text_atomic(Path(path), to_junit(report, fail_on))
