"""JUnit XML as GitHub Actions and GitLab read it: one testcase per named check.

<testsuites> holds one <testsuite>; each check that ran is a <testcase> (classname
`qfinal.validate` or `qfinal.validate.fast`, name = the check's stable name). A check with
findings at or above the fail level gets one <failure> (message: a summary; type: the check;
text: one line per finding, key and message). Lower findings go to <system-out>. Checks that
could not run in this mode are <skipped> testcases with the reason.
"""

from __future__ import annotations

import re
import socket
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

from qfinal.checkpoint.atomic import write_text_atomic
from qfinal.report import Finding, Report, Severity

# Everything XML 1.0 allows (tabs, newlines, BMP minus surrogates, astral planes).
_INVALID_XML = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
MAX_LINES = 500  # findings written out per check; the JSON report has them all
MAX_MESSAGE = 1000


def _xml_text(text: str) -> str:
    """Tensor names come from untrusted files: escape what XML 1.0 cannot carry."""
    return _INVALID_XML.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _line(f: Finding) -> str:
    return f"[{f.severity}] {f.key or '-'}: {f.message}"


def _lines(findings: list[Finding]) -> str:
    lines = [_line(f) for f in findings[:MAX_LINES]]
    if len(findings) > MAX_LINES:
        lines.append(f"… {len(findings) - MAX_LINES} more (see the JSON report)")
    return _xml_text("\n".join(lines))


def to_junit(report: Report, fail_on: Severity = "error") -> str:
    ran = list(report.checks)
    ran += sorted({f.check for f in report.findings} - set(ran))  # never drop a finding's check
    skipped = {c: why for c, why in (report.extra.get("skipped_checks") or {}).items() if c not in ran}
    classname = "qfinal." + report.command.replace(" --", ".").replace(" ", ".")
    seconds = sum(s.seconds for s in report.stages)
    suite = ET.Element(
        "testsuite",
        name=classname,
        tests=str(len(ran) + len(skipped)),
        failures="0",
        errors="0",
        skipped=str(len(skipped)),
        time=f"{seconds:.3f}",
        timestamp=datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        hostname=_xml_text(socket.gethostname() or "localhost"),
    )
    props = ET.SubElement(suite, "properties")
    for name, value in (
        ("source", report.source),
        ("model_class", report.model_class or ""),
        ("quantization", report.quantization),
        ("fail_on", fail_on),
        *((("commit", report.commit),) if report.commit else ()),
    ):
        ET.SubElement(props, "property", name=name, value=_xml_text(str(value)))
    failures = 0
    for check in ran:
        case = ET.SubElement(suite, "testcase", classname=classname, name=check, time="0")
        failing = report.check_status(check, fail_on)
        if failing:
            failures += 1
            first = failing[0]
            summary = (
                f"{check}: {len(failing)} finding(s); first: " + (f"{first.key}: " if first.key else "") + first.message
            )
            failure = ET.SubElement(case, "failure", message=_xml_text(summary[:MAX_MESSAGE]), type=check)
            failure.text = _lines(failing)
        failing_ids = {id(f) for f in failing}
        rest = [f for f in report.findings if f.check == check and id(f) not in failing_ids]
        if rest:
            ET.SubElement(case, "system-out").text = _lines(rest)
    for check, why in skipped.items():
        case = ET.SubElement(suite, "testcase", classname=classname, name=check, time="0")
        ET.SubElement(case, "skipped", message=_xml_text(str(why)))
    suite.set("failures", str(failures))
    suites = ET.Element(
        "testsuites",
        name="qfinal",
        tests=suite.get("tests"),
        failures=str(failures),
        errors="0",
        skipped=str(len(skipped)),
        time=suite.get("time"),
    )
    suites.append(suite)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def write_junit(report: Report, path: Path, fail_on: Severity = "error") -> None:
    write_text_atomic(Path(path), to_junit(report, fail_on))
