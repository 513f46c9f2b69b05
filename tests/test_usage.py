"""Usage limits: what GetUsageLimits answers is read into ``convert.UsageLimits``."""

from __future__ import annotations

import dataclasses
import json

import pytest

import convert
import fakes

TRIAL_END = 1793491200  # 2026-11-01 00:00 UTC


def limits(plan, used, limit, **row):
    """A GetUsageLimits answer of ``plan`` with ``used`` of ``limit`` credits."""
    overage = row.pop("overage", "DISABLED")
    return {**fakes.USAGE_LIMITS, "subscriptionInfo": {"subscriptionTitle": plan},
            "overageConfiguration": {"overageStatus": overage},
            "usageBreakdownList": [{"resourceType": "CREDIT", "currentUsage": int(used),
                                    "currentUsageWithPrecision": used,
                                    "usageLimitWithPrecision": limit, **row}]}


FREE_NEAR_LIMIT = limits("KIRO FREE", 46.0, 50, freeTrialInfo={
    "freeTrialStatus": "ACTIVE", "usageLimitWithPrecision": 500.0,
    "currentUsageWithPrecision": 10.5, "freeTrialExpiry": TRIAL_END})
PRO_PLUS_WITH_BONUS = limits("KIRO PRO+", 300.25, 2000, bonuses=[{
    "bonusCode": "WELCOME", "displayName": "Welcome bonus", "status": "ACTIVE",
    "currentUsage": 0, "usageLimit": 100, "expiresAt": "2026-12-01T00:00:00Z"}])
POWER_IN_OVERAGE = limits("KIRO POWER", 10000.0, 10000, overage="ENABLED",
                          currentOveragesWithPrecision=125.5)


# Usage limits read ########################################################


def test_usage_limits_read_overage_trial_and_bonuses():
    usage = convert.usage_limits(PRO_PLUS_WITH_BONUS)
    assert (usage.plan, usage.used, usage.limit, usage.overage) == ("KIRO PRO+", 300.25, 2000,
                                                                   False)
    assert usage.extra == ({"kind": "bonus", "name": "Welcome bonus", "status": "ACTIVE",
                            "used": 0, "limit": 100, "expires_at": 1796083200.0},)
    power = convert.usage_limits(POWER_IN_OVERAGE)
    assert power.overage and power.overage_used == 125.5 and not power.exhausted
    assert power.percent == 100.0
    free = convert.usage_limits(FREE_NEAR_LIMIT)
    assert free.extra[0]["expires_at"] == TRIAL_END and free.extra[0]["kind"] == "free_trial"


def test_usage_limits_from_another_replica_ignore_what_they_do_not_know():
    usage = convert.usage_limits(FREE_NEAR_LIMIT)
    sent = json.loads(json.dumps(dataclasses.asdict(usage)))
    assert convert.UsageLimits.from_fields({**sent, "from_a_newer_version": 1}) == usage
    older = {k: v for k, v in sent.items() if k not in ("extra", "overage_used")}
    assert convert.UsageLimits.from_fields(older).extra == ()


@pytest.mark.parametrize("row, expected", [
    ({"bonuses": [{"bonusCode": "B1", "usageLimitWithPrecision": 5.5, "expiresAt": 17e8}]},
     ({"kind": "bonus", "name": "B1", "status": None, "used": None, "limit": 5.5,
       "expires_at": 17e8},)),
    ({"bonuses": "none", "freeTrialInfo": "none"}, ()),
    ({"bonuses": [None, {"expiresAt": "not a date"}]},
     ({"kind": "bonus", "name": "bonus", "status": None, "used": None, "limit": None,
       "expires_at": None},)),
], ids=["number-expiry", "not-lists", "odd-entries"])
def test_extra_credits_take_what_they_can(row, expected):
    assert convert.extra_credits(row) == expected
