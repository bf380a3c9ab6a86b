"""twistd plugin: `twistd mailhost [--config FILE]`. Heavy imports happen in makeService."""

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IServiceMaker, IPlugin)
class MailhostServiceMaker:
    tapname = "mailhost"
    description = "mailhost: SMTP, submission, POP3 and IMAP on Maildir"

    @property
    def options(self):
        from mailhost.tap import Options

        return Options

    def makeService(self, options):
        from mailhost.tap import makeService

        return makeService(options)


serviceMaker = MailhostServiceMaker()
