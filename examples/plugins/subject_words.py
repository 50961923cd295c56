"""An example rule plugin, written as a user would: it imports nothing but ``smtpgate``.

Put this file in a folder listed under ``plugins:`` in gate.yaml, then use it in a policy:

    rules:
      - subject_words: {words: ["invoice overdue", "wire transfer"], action: tag}

It also brings a command of its own, ``smtpgate subject-words`` (what each policy looks for),
once a package registers ``add_parser`` in the ``smtpgate.commands`` entry-point group:

    [project.entry-points."smtpgate.commands"]
    subject-words = "subject_words:add_parser"
"""
import json

from smtpgate import Option, Rule, Verdict, list_of, one_of, string


class SubjectWords(Rule):
    """Reject, or tag with a header, messages whose Subject holds one of ``words``."""

    name = "subject_words"
    words = Option(list_of(string), [], "phrases to look for (case-insensitive)")
    action = Option(one_of("reject", "tag"), "tag", "reject at DATA, or add a header")
    header = Option(string, "X-Subject-Words", "the header 'tag' adds")

    def setup(self):
        self._phrases = [w.lower() for w in self.words]

    async def on_data(self, message, results):  # a hook names the arguments it wants
        subject = (message.get("Subject") or "").lower()
        hit = next((w for w in self._phrases if w in subject), None)
        if hit is None:
            results.add(self, pass_="no listed phrase")
            return None
        results.add(self, fail=f"subject has {hit!r}")  # later rules, the trace and the log read it
        if self.action == "reject":
            return Verdict.reject("Message refused by content policy", reason=f"subject has {hit!r}")
        message.prepend_header(self.header, hit)
        return None


# --- its command: smtpgate subject-words [--json] -------------------------------------------

def add_parser(subparsers, common):
    """Add ``smtpgate subject-words``; return its handler."""
    p = subparsers.add_parser("subject-words", parents=[common],
                              help="the phrases each policy's subject_words rule looks for")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    return list_phrases


def list_phrases(args, context) -> int:
    """Print, per policy, the rule's phrases and action (exit 0, as every listing)."""
    found = [{"policy": policy.name, "words": list(rule.words), "action": rule.action}
             for policy, rule in context.policy_rules(lambda r: r.name == SubjectWords.name)]
    if args.json:
        print(json.dumps({"policies": found}, indent=2))
    else:
        for f in found:
            print(f"{f['policy']}: {f['action']} {', '.join(f['words']) or '(no phrases)'}")
        if not found:
            print("no policy uses subject_words")
    return 0
