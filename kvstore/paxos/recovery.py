"""The recovery of a wiped node (one that lost its disk, issue 19): a part of ``Replica``
(``kvstore.paxos.replica`` mixes it in; the protocol and why it is safe are in that
module's docstring, "Wiped nodes"). A replica whose durable promise is 0 votes only
after every other node reported its promise, raised it to a fence and reported the
highest slot it holds, and this replica learned the chosen values up to there
(``_Recovery``: phases 1 to 3). Pure: no I/O.
"""

from __future__ import annotations

from kvstore.paxos import messages as M
from kvstore.paxos.ballot import ballot_epoch, ballot_node, ballot_round, format_ballot, make_ballot
from kvstore.paxos.interface import FOLLOWER, LEADER
from kvstore.paxos.messages import Message


class _Recovery:
    """A node without Paxos state finding out what it may have forgotten (module docstring).

    ``phase`` 1: every other node reports its promise (a majority empty, this node
    included, ends it: a fresh cluster); 2: every other node raises its promise to the
    fence and reports again (promise, highest slot held); 3: this node learns the chosen
    values up to ``target``, then raises its own promise to ``promise`` and votes.
    """

    __slots__ = ("nonce", "phase", "reports", "fence", "target", "promise", "asked_tick")

    def __init__(self, nonce: int) -> None:
        self.nonce = nonce
        self.phase = 1
        self.reports: dict = {}  # node -> (promise, highest slot held)
        self.fence = 0
        self.target = -1
        self.promise = 0
        self.asked_tick = 0


class WipedRecovery:
    """Recovery of a wiped node, a part of ``Replica`` (the module docstring)."""

    @property
    def recovering(self) -> bool:
        """True while this replica does not vote (it restarted with no Paxos state)."""
        return self.recovery is not None

    def _followed_ballot(self) -> int:
        """The ballot whose leader may send this replica a snapshot: the one it promised, or
        while it only learns (recovering, or behind a later epoch) the one it learns from."""
        if self.recovery is not None or ballot_epoch(self.learn_ballot) > self.membership.epoch:
            return self.learn_ballot
        return self.promised

    def _highest_held(self) -> int:
        """The highest slot this replica holds anything at: accepted, chosen or snapshotted."""
        return max(self._last_slot(), self.commit_index)

    def _holds_nothing(self) -> bool:
        return self.promised == 0 and not self.log and self.commit_index < 0 and self.snapshot_index < 0

    def _recovery_ask(self) -> None:
        rc = self.recovery
        rc.asked_tick = self.ticks
        for i in self.voters:
            if i != self.id and (rc.phase == 3 or i not in rc.reports):
                self._send(Message(M.RECOVER, i, self.id, ballot=rc.fence, context=rc.nonce,
                                   commit_index=rc.target if rc.phase == 3 else -1,
                                   match_index=self.commit_index))

    def _on_recover(self, m: Message) -> None:
        """Any node, any role: report what a recovering node needs, after the fence.

        The fence is a promise like any other: durable before the reply that announces it
        leaves (rule 1), so the reporter accepts nothing below it afterwards. A node that is
        recovering itself raises nothing: its promise stays 0 until it has recovered (its
        durable marker), and it does not accept anything before then anyway.
        """
        if ballot_epoch(m.ballot) > self.membership.epoch:
            return  # a fence of an epoch not reached: promised once this replica is there
        if m.ballot > self.promised and self.recovery is None and m.ballot > 0:
            self._set_promised(m.ballot)
            if self.role != FOLLOWER:
                self._become_follower(None)
            self.leader = None
        if self.role == LEADER and m.commit_index >= self.next_slot:
            self.noop_target = max(self.noop_target, m.commit_index)
        self._send(Message(M.RECOVER_REPLY, m.frm, self.id, hint=self.promised,
                           match_index=self._highest_held(), commit_index=self.commit_index,
                           context=m.context))
        # What it lacks of the chosen values: through a membership change it missed, it
        # moves to the epoch that followed and asks that epoch's voters (their reports are
        # the ones it needs; one removed since may never answer again).
        self._send_chosen(m.frm, m.match_index)

    def _on_recover_reply(self, m: Message) -> None:
        rc = self.recovery
        if rc is None or rc.phase == 3 or m.context != rc.nonce or m.frm not in self.vpos:
            return  # an answer to an earlier question (or an earlier incarnation's), or a non-voter's
        rc.reports[m.frm] = (m.hint, m.match_index)

    def _every_other_voter_reported(self) -> bool:
        return all(v in self.recovery.reports for v in self.voters if v != self.id)

    def _restart_recovery(self) -> None:
        """The membership changed while recovering: ask the new voters from the start."""
        self.recovery = _Recovery(self.rng.randrange(1 << 40) << 20)
        self._log_event("recovering: the voters changed; asking them from the start")
        self._recovery_ask()

    def _advance_recovery(self) -> None:
        rc = self.recovery
        if rc.phase == 1:
            if self._holds_nothing():
                empty = 1 + sum(1 for p, h in rc.reports.values() if p == 0 and h < 0)
                if empty >= self.quorum:
                    self._log_event("recovered: a majority holds no state (a new cluster); voting")
                    self.recovery = None
                    return
            if not self._every_other_voter_reported():
                return
            top = max(p for p, _h in rc.reports.values())
            # Every ballot this node led before it lost its disk is <= top; the fence must be
            # above them all, and need not be above top otherwise (no election for it).
            rc.fence = make_ballot(ballot_round(top) + 1, 0) if top and ballot_node(top) == self.id else top
            rc.phase, rc.reports, rc.nonce = 2, {}, rc.nonce + 1
            self._log_event(f"recovering: fence {format_ballot(rc.fence)}")
            self._recovery_ask()
            return
        if rc.phase == 2:
            if not self._every_other_voter_reported():
                return
            rc.promise = max(rc.fence, max(p for p, _h in rc.reports.values()))
            rc.target = max(h for _p, h in rc.reports.values())
            if len(self.voters) % 2 == 0:
                # Any two majorities of an even cluster share two nodes: one that forgot its
                # votes never is the only witness of a chosen value; and the others could not
                # choose the slots up to the target without this node (in a 2-node cluster).
                rc.target = -1
            rc.phase = 3
            self._log_event(f"recovering: learning the chosen values through {rc.target}")
            self._recovery_ask()  # the leader fills slots up to the target if it must
        if self.commit_index >= rc.target:
            self.recovery = None
            self._set_promised(max(rc.promise, self.promised))
            self.learn_ballot = 0
            self._log_event(f"recovered: promise {format_ballot(self.promised)}, chosen values held "
                            f"through {self.commit_index}; voting")
