"""The escalation rules: a conversation and `now` in, the changed conversation out."""

import time

import pytest
from conftest import ALARM, BACKUP, CUSTOMER, LINE, OTHER_CUSTOMER, SERGIO, msid
from freezegun import freeze_time

import relay

SERGIO_C = relay.Contact("Sergio", SERGIO, 120)
BACKUP_C = relay.Contact("Backup", BACKUP, 300)
QDN = relay.Line("QDN", LINE, (SERGIO_C, BACKUP_C))


def new_conversation(sid="SM" + "1" * 32, sender=CUSTOMER, code="1", repeat=0, alarm=None, body="hi"):
    config = relay.Config(lines=(QDN,), repeat=repeat, alarm_phone=alarm)
    return relay.start_conversation(QDN, config, sid, sender, body, code, time.time())


def paged(conv, kind="page"):
    return [p.to for p in conv.pages if p.kind == kind]


@pytest.fixture
def clock():
    with freeze_time("2026-11-27 12:00:00") as frozen:
        yield frozen


def test_primary_is_paged_at_once(clock):
    conv = new_conversation()
    assert paged(conv) == [SERGIO]
    assert conv.pages[0].retry_at == time.time()
    assert relay.next_wakeup(conv) == time.time()


def test_backup_is_not_paged_a_second_before_the_wait_runs_out(clock):
    conv = new_conversation()
    clock.tick(119.999)
    assert relay.expire(conv, time.time()) is None
    assert paged(conv) == [SERGIO]


def test_backup_is_paged_when_the_wait_runs_out(clock):
    conv = new_conversation()
    clock.tick(120)
    assert relay.expire(conv, time.time()) == "escalated"
    assert paged(conv) == [SERGIO, BACKUP]
    assert conv.deadline == time.time() + 300


def test_wait_counts_from_when_the_step_began_not_from_a_successful_send(clock):
    conv = new_conversation()
    clock.tick(100)
    error = relay.SendError("twilio 500", permanent=False)
    relay.record_send_error(conv, 0, error, time.time(), jitter=0.5)
    clock.tick(20)
    assert relay.expire(conv, time.time()) == "escalated"


def test_conversation_is_unanswered_after_the_last_contact(clock):
    conv = new_conversation()
    clock.tick(120)
    relay.expire(conv, time.time())
    clock.tick(300)
    assert relay.expire(conv, time.time()) == "unanswered"
    assert conv.status == "unanswered"
    for index in range(len(conv.pages)):
        relay.record_sent(conv, index, f"SM{index}", time.time())
    assert relay.next_wakeup(conv) is None


def test_repeat_starts_the_chain_over(clock):
    conv = new_conversation(repeat=1)
    for wait in (120, 300, 120):
        clock.tick(wait)
        assert relay.expire(conv, time.time()) == "escalated"
    assert paged(conv) == [SERGIO, BACKUP, SERGIO, BACKUP]
    clock.tick(300)
    assert relay.expire(conv, time.time()) == "unanswered"


def test_alarm_phone_is_told_when_nobody_answers(clock):
    conv = new_conversation(alarm=ALARM)
    clock.tick(120)
    relay.expire(conv, time.time())
    clock.tick(300)
    relay.expire(conv, time.time())
    assert paged(conv, "alarm") == [ALARM]
    assert "UNANSWERED" in conv.pages[-1].body and CUSTOMER in conv.pages[-1].body


def test_nobody_is_paged_after_an_acknowledgement(clock):
    conv = new_conversation()
    relay.acknowledge(conv, SERGIO_C, {"sid": msid("2")}, time.time())
    clock.tick(10_000)
    assert relay.expire(conv, time.time()) is None
    assert paged(conv) == [SERGIO]
    assert conv.acknowledged_by == "Sergio"


def test_acknowledgement_cancels_a_page_still_waiting_to_be_sent(clock):
    conv = new_conversation()
    clock.tick(120)
    relay.expire(conv, time.time())
    relay.acknowledge(conv, SERGIO_C, {"sid": msid("2")}, time.time())
    assert [p.state for p in conv.pages] == ["cancelled", "cancelled"]
    assert conv.is_settled(time.time(), retention=7 * 86400)


def test_contacts_already_paged_are_told_who_took_it(clock):
    conv = new_conversation()
    relay.record_sent(conv, 0, msid("1"), time.time())
    clock.tick(120)
    relay.expire(conv, time.time())
    relay.record_sent(conv, 1, msid("2"), time.time())
    relay.acknowledge(conv, BACKUP_C, {"sid": msid("3")}, time.time())
    notices = [p for p in conv.pages if p.kind == "notice"]
    assert [p.to for p in notices] == [SERGIO]
    assert "taken by Backup" in notices[0].body


def test_a_delivery_failure_reported_before_the_rest_answer_is_stored_stands(clock):
    conv = new_conversation()
    assert relay.record_status(conv, 0, "undelivered", "30003", time.time()) == "escalated"
    relay.record_sent(conv, 0, msid("1"), time.time())  # Twilio's answer to the send, stored after its callback
    assert conv.pages[0].state == "undelivered" and conv.pages[0].sid == msid("1")
    assert conv.step == 1


def test_nobody_is_told_when_the_only_contact_paged_takes_it(clock):
    conv = new_conversation()
    relay.record_sent(conv, 0, msid("1"), time.time())
    relay.acknowledge(conv, SERGIO_C, {"sid": msid("3")}, time.time())
    assert paged(conv, "notice") == []


def test_reply_code_picks_the_conversation_when_several_are_open(clock):
    first = new_conversation(sid=msid("1"), code="1")
    clock.tick(1)
    second = new_conversation(sid=msid("2"), sender=OTHER_CUSTOMER, code="2")
    chosen, code = relay.choose_acknowledged([first, second], SERGIO, relay.read_reply("#1 on it"))
    assert chosen is first and code == "1"


def test_bare_code_alone_acknowledges_that_conversation(clock):
    first = new_conversation(sid=msid("1"), code="7")
    clock.tick(1)
    second = new_conversation(sid=msid("2"), sender=OTHER_CUSTOMER, code="8")
    assert relay.choose_acknowledged([first, second], SERGIO, relay.read_reply(" 7 "))[0] is first


def test_reply_without_code_acknowledges_the_newest_paged_to_that_contact(clock):
    first = new_conversation(sid=msid("1"), code="1")
    clock.tick(1)
    second = new_conversation(sid=msid("2"), sender=OTHER_CUSTOMER, code="2")
    assert relay.choose_acknowledged([first, second], SERGIO, relay.read_reply("ok"))[0] is second


def test_reply_without_code_does_not_acknowledge_what_the_contact_never_got(clock):
    conv = new_conversation()
    assert relay.choose_acknowledged([conv], BACKUP, relay.read_reply("got it"))[0] is None


def test_bare_number_that_is_no_open_code_acknowledges_nothing(clock):
    conv = new_conversation(code="1")
    assert relay.choose_acknowledged([conv], SERGIO, relay.read_reply("12")) == (None, "12")


def test_bare_word_that_is_no_code_acknowledges_the_newest(clock):
    conv = new_conversation(code="1")
    assert relay.choose_acknowledged([conv], SERGIO, relay.read_reply("ok")) == (conv, None)


def test_reply_naming_a_letter_code_that_is_not_open_acknowledges_nothing(clock):
    conv = new_conversation(code="1")
    assert relay.choose_acknowledged([conv], SERGIO, relay.read_reply("#ab on it")) == (None, "AB")


def test_reply_naming_an_unknown_code_acknowledges_nothing(clock):
    conv = new_conversation(code="1")
    assert relay.choose_acknowledged([conv], SERGIO, relay.read_reply("#42 done")) == (None, "42")


@pytest.mark.parametrize("body", ["STOP", "stop", "Help", "UNSUBSCRIBE", "start", "STOP."])
def test_stop_and_help_keywords_are_not_acknowledgements(body):
    assert relay.read_reply(body).keyword


def test_ordinary_reply_is_not_a_keyword():
    assert not relay.read_reply("stop the boat, on my way").keyword


def test_follow_up_is_relayed_to_every_contact_already_paged(clock):
    conv = new_conversation()
    clock.tick(120)
    relay.expire(conv, time.time())
    relay.join(conv, msid("9"), "also bring a life jacket", time.time())
    followups = [p for p in conv.pages if p.kind == "followup"]
    assert [p.to for p in followups] == [SERGIO, BACKUP]
    assert "life jacket" in followups[0].body and "#1" in followups[0].body
    assert relay.expire(conv, time.time()) is None  # joining starts no new chain


def test_escalation_page_carries_follow_ups_too(clock):
    conv = new_conversation(body="first")
    relay.join(conv, msid("9"), "second", time.time())
    clock.tick(120)
    relay.expire(conv, time.time())
    assert "first" in conv.pages[-1].body and "second" in conv.pages[-1].body


def test_relay_text_is_never_over_1600_characters():
    conv = new_conversation(body="🚤" * 2000)
    body = conv.pages[0].body
    assert relay.utf16_len(body) <= 1600
    assert body.endswith("…") and CUSTOMER in body and "#1" in body


def test_short_relay_text_is_not_cut():
    assert relay.fit_sms("hello") == "hello"


# -- delivery failures ----------------------------------------------------


def test_permanent_error_pages_the_next_contact_at_once(clock):
    conv = new_conversation()
    error = relay.SendError("twilio 400 21211", permanent=True, code=21211)
    assert relay.record_send_error(conv, 0, error, time.time(), jitter=0.0) == "escalated"
    assert paged(conv) == [SERGIO, BACKUP]
    assert conv.pages[0].state == "failed"


def test_transient_error_is_retried_with_backoff(clock):
    conv = new_conversation()
    conv.pages[0].attempts = 1
    error = relay.SendError("twilio 500", permanent=False)
    assert relay.record_send_error(conv, 0, error, time.time(), jitter=0.0) == "retry"
    assert conv.pages[0].state == "pending"
    assert conv.pages[0].retry_at == time.time() + 0.5


def test_backoff_grows_and_is_bounded():
    delays = [relay.retry_delay(n, None, jitter=0.999) for n in range(1, 12)]
    assert delays == sorted(delays)
    assert delays[1] > delays[0] * 1.9
    assert max(delays) <= relay.RETRY_CAP


def test_backoff_jitter_spreads_retries():
    assert relay.retry_delay(3, None, 0.0) < relay.retry_delay(3, None, 0.9)


def test_retry_after_is_honoured():
    assert relay.retry_delay(1, 7.0, jitter=0.0) == 7.0


def test_a_long_outage_keeps_retrying_the_page(clock):
    conv = new_conversation()
    conv.pages[0].attempts = 50
    error = relay.SendError("twilio 503", permanent=False)
    assert relay.record_send_error(conv, 0, error, time.time(), jitter=0.0) == "retry"
    assert conv.pages[0].retry_at == time.time() + relay.RETRY_CAP / 2


def test_transient_errors_give_up_after_max_attempts_and_move_on(clock):
    conv = new_conversation()
    conv.pages[0].attempts = relay.MAX_ATTEMPTS
    error = relay.SendError("twilio 503", permanent=False)
    assert relay.record_send_error(conv, 0, error, time.time(), jitter=0.0) == "escalated"


def test_failed_delivery_report_for_the_contact_on_duty_escalates(clock):
    conv = new_conversation()
    relay.record_sent(conv, 0, msid("x"), time.time())
    assert relay.record_status(conv, 0, "undelivered", "30003", time.time()) == "escalated"
    assert paged(conv) == [SERGIO, BACKUP]


def test_failed_delivery_report_for_an_earlier_step_changes_nothing(clock):
    conv = new_conversation()
    clock.tick(120)
    relay.expire(conv, time.time())
    assert relay.record_status(conv, 0, "failed", "30005", time.time()) is None
    assert paged(conv) == [SERGIO, BACKUP]


def test_delivered_report_is_recorded(clock):
    conv = new_conversation()
    relay.record_sent(conv, 0, msid("x"), time.time())
    relay.record_status(conv, 0, "delivered", None, time.time())
    assert conv.pages[0].state == "delivered"


@pytest.mark.parametrize(
    ("status", "code", "permanent"),
    [(400, 21211, True), (400, 21610, True), (400, 21614, True), (404, None, True), (429, 20429, False)]
    + [(500, None, False), (503, None, False), (401, 20003, False), (403, 20003, False), (None, None, False)],
)
def test_twilio_errors_are_sorted_into_permanent_and_transient(status, code, permanent):
    assert relay.classify_twilio_error(status, code) is permanent


def test_reply_codes_skip_those_in_use_and_wrap():
    assert relay.next_code({"2"}, 1) == ("3", 3)
    assert relay.next_code({"2"}, 2) == ("3", 3)
    assert relay.next_code(set(), 999_999) == ("1", 1)


def test_reply_codes_do_not_run_out_at_four_digits():
    in_use = {str(n) for n in range(1, 10_000)}
    assert relay.next_code(in_use, 9_999) == ("10000", 10_000)
    assert relay.next_code(in_use, 0) == ("10000", 10_000)


def test_a_six_digit_code_in_a_reply_is_read_whole():
    assert relay.named_code(relay.read_reply("#123456 on it"), set()) == "123456"
    assert relay.named_code(relay.read_reply("123456"), set()) == "123456"


def test_wait_counts_from_when_the_step_began_even_when_the_send_succeeds_late(clock):
    conv = new_conversation()
    clock.tick(100)
    relay.record_sent(conv, 0, msid("late"), time.time())
    clock.tick(20)
    assert relay.expire(conv, time.time()) == "escalated"


def test_a_failed_delivery_report_after_an_acknowledgement_changes_nothing(clock):
    conv = new_conversation()
    relay.record_sent(conv, 0, msid("x"), time.time())
    relay.acknowledge(conv, SERGIO_C, {"sid": msid("ack")}, time.time())
    assert relay.record_status(conv, 0, "failed", "30003", time.time()) is None
    assert conv.status == "acknowledged" and paged(conv) == [SERGIO]


def test_retry_after_is_capped_at_five_minutes():
    assert relay.retry_delay(1, 10_000, 0.0) == relay.RETRY_AFTER_CAP == 300


def test_relay_text_fits_1600_utf16_units_counted_independently():
    for body in ("🚤" * 2000, "é" * 3000, "x" * 5000, "🚤x" * 900, "🚤" * 790):
        text = new_conversation(body=body).pages[0].body
        assert len(text.encode("utf-16-le")) // 2 <= 1600
        assert len(text.encode("utf-16-le")) // 2 >= 1500  # cut near the limit, not far below it


def test_a_page_with_emoji_counts_two_units_for_each():
    assert relay.utf16_len("🚤") == 2 and relay.utf16_len("é") == 1


def test_a_page_taken_while_with_twilio_tells_its_contact_who_took_it(clock):
    conv = new_conversation()
    relay.record_sent(conv, 0, msid("p0"), time.time())
    clock.tick(120)
    relay.expire(conv, time.time())  # the backup's page is handed to Twilio...
    relay.acknowledge(conv, SERGIO_C, {"sid": msid("ack")}, time.time())  # ...and Sergio answers meanwhile
    relay.record_sent(conv, 1, msid("p1"), time.time())
    notices = [p for p in conv.pages if p.kind == "notice"]
    assert [(p.to, p.body) for p in notices] == [(BACKUP, f"QDN #1 from {CUSTOMER} was taken by Sergio.")]


def test_a_page_not_yet_with_twilio_is_never_sent_after_an_acknowledgement(clock):
    conv = new_conversation()
    relay.acknowledge(conv, SERGIO_C, {"sid": msid("ack")}, time.time())
    assert conv.pages[0].state == "cancelled"
    assert relay.next_wakeup(conv) is None


@pytest.mark.parametrize("code", [21211, 21408, 21606, 21608, 21610, 21612, 21614, 21635, 21660, 30003, 30005])
def test_recipient_error_codes_are_permanent_whatever_the_status(code):
    assert relay.classify_twilio_error(None, code) is True


def test_a_text_of_exactly_1600_units_is_not_cut():
    assert relay.fit_sms("x" * 1600) == "x" * 1600
    assert relay.fit_sms("x" * 1601) != "x" * 1601


def test_a_duration_without_a_unit_is_seconds():
    assert relay.parse_duration("90", "wait") == 90
    assert relay.parse_duration("2m", "wait") == 120


def test_retention_and_the_catch_up_window_default_to_seven_days_and_one_day():
    defaults = relay.Config(lines=(QDN,))
    assert (defaults.retention, defaults.catch_up_window) == (7 * 24 * 60 * 60, 24 * 60 * 60)


def test_a_retry_after_date_counts_the_seconds_until_it(clock):
    assert relay.parse_retry_after("Fri, 27 Nov 2026 12:00:30 GMT") == 30.0
    assert relay.parse_retry_after("Fri, 27 Nov 2026 11:59:00 GMT") == 0.0


def test_a_cut_text_uses_the_whole_1600_units():
    for extra in (1, 2, 3, 500):
        assert relay.utf16_len(relay.fit_sms("x" * (1600 + extra))) == 1600
