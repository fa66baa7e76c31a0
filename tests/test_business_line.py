"""What a business line needs beyond paging: two-way replies, the customer kept informed, hours, photos."""

import time

import pytest
from conftest import BACKUP, CUSTOMER, LINE, SERGIO, RunAtOnce, barrier, config_text, make_relay, msid, wait_until
from freezegun import freeze_time

import relay

pytestmark = pytest.mark.both_stores  # the shared behaviour suite: run on each store

SERGIO_C = relay.Contact("Sergio", SERGIO, 120)
BACKUP_C = relay.Contact("Backup", BACKUP, 300)


def line(**options) -> relay.Line:
    chain = options.pop("chain", (SERGIO_C, BACKUP_C))
    return relay.Line("QDN", LINE, chain, **options)


def start(qdn: relay.Line, body="hi", media=()) -> relay.Conversation:
    return relay.start_conversation(qdn, relay.Config(lines=(qdn,)), msid("1"), CUSTOMER, body, "7", time.time(), media)


def to_customer(conv: relay.Conversation) -> list[relay.Page]:
    return [p for p in conv.pages if p.to == CUSTOMER]


@pytest.fixture
def clock():
    with freeze_time("2026-11-27 20:00:00") as frozen:  # 12:00 in Los Angeles
        yield frozen


# -- two-way ------------------------------------------------------------------


@pytest.mark.parametrize("body", ["#7", "ok", "#7 ok", "7", "Got it!", "#7 👍", "on it."])
def test_bare_acknowledgements_are_recognised(body):
    assert relay.read_reply(body).bare_ack


@pytest.mark.parametrize("body", ["#7 on my way, 10 min", "10 min", "Yes we have kayaks at 9", "call me"])
def test_replies_with_something_to_say_are_not_bare(body):
    assert not relay.read_reply(body).bare_ack


def test_two_way_reply_goes_to_the_customer_without_the_code(clock):
    conv = start(line(reply_to_sender=True))
    relay.acknowledge(conv, SERGIO_C, {"sid": msid("2")}, time.time())
    assert relay.reply_to_customer(conv, relay.read_reply("#7 on my way, 10 min"), time.time())
    (page,) = to_customer(conv)
    assert page.body == "on my way, 10 min" and page.kind == "customer_reply"


def test_bare_acknowledgement_is_not_relayed_to_the_customer(clock):
    conv = start(line(reply_to_sender=True))
    assert not relay.reply_to_customer(conv, relay.read_reply("#7"), time.time())
    assert to_customer(conv) == []


def test_replies_are_not_relayed_on_a_one_way_line(clock):
    conv = start(line())
    assert not relay.reply_to_customer(conv, relay.read_reply("#7 on my way"), time.time())


def test_customer_answer_after_acknowledgement_goes_to_the_contact_who_took_it(clock):
    conv = start(line(reply_to_sender=True))
    clock.tick(120)
    relay.expire(conv, time.time())
    relay.acknowledge(conv, BACKUP_C, {"sid": msid("2")}, time.time())
    assert conv.is_live_two_way(time.time())
    relay.join(conv, msid("3"), "great, see you", time.time())
    (followup,) = [p for p in conv.pages if p.kind == "followup"]
    assert followup.to == BACKUP and "great, see you" in followup.body


def test_two_way_conversation_stops_talking_after_a_day(clock):
    conv = start(line(reply_to_sender=True))
    relay.acknowledge(conv, SERGIO_C, {"sid": msid("2")}, time.time())
    clock.tick(relay.TWO_WAY_WINDOW)
    assert not conv.is_live_two_way(time.time())


def test_reply_without_code_reaches_the_conversation_the_contact_is_talking_in(clock):
    conv = start(line(reply_to_sender=True))
    relay.acknowledge(conv, SERGIO_C, {"sid": msid("2")}, time.time())
    assert relay.choose_acknowledged([], SERGIO, relay.read_reply("see you at 9"), talking=[conv]) == (conv, None)


def test_a_day_after_a_two_way_conversation_was_taken_a_contacts_text_no_longer_reaches_its_customer(tmp_path, clock):
    service = make_relay(tmp_path / "state", relay.Config(lines=(line(reply_to_sender=True),)))
    service.outbox.senders = RunAtOnce()
    service.receive(
        relay.read_inbound({"MessageSid": msid("c1"), "From": CUSTOMER, "To": LINE, "Body": "kayaks at 9?"})
    )
    service.receive(
        relay.read_inbound({"MessageSid": msid("s1"), "From": SERGIO, "To": LINE, "Body": "#1 yes, two left"})
    )
    clock.tick(relay.TWO_WAY_WINDOW)  # no sweep since: the conversation is still in the store, not archived
    service.receive(relay.read_inbound({"MessageSid": msid("s2"), "From": SERGIO, "To": LINE, "Body": "still coming?"}))
    assert msid("c1") in service.store.conversations
    assert [body for _, to, body in service.gateway.sent if to == CUSTOMER] == ["yes, two left"]


# -- the customer kept in the loop --------------------------------------------


def test_customer_is_told_when_a_contact_takes_it(clock):
    conv = start(line(acknowledged_text="{contact} from {line} has your message."))
    relay.acknowledge(conv, SERGIO_C, {"sid": msid("2")}, time.time())
    (page,) = to_customer(conv)
    assert page.body == "Sergio from QDN has your message." and page.kind == "customer_acknowledged"


def test_customer_is_told_when_nobody_answers(clock):
    conv = start(line(unanswered_text="Sorry, nobody at {line} could answer. Please call."))
    clock.tick(120)
    relay.expire(conv, time.time())
    clock.tick(300)
    relay.expire(conv, time.time())
    assert [p.body for p in to_customer(conv)] == ["Sorry, nobody at QDN could answer. Please call."]


def test_customer_is_told_each_thing_at_most_once(clock):
    conv = start(line(acknowledged_text="taken"))
    relay.acknowledge(conv, SERGIO_C, {"sid": msid("2")}, time.time())
    relay.tell_customer(conv, "acknowledged", time.time(), "Backup")
    assert len(to_customer(conv)) == 1


def test_customer_hears_nothing_without_templates(clock):
    conv = start(line())
    relay.acknowledge(conv, SERGIO_C, {"sid": msid("2")}, time.time())
    assert to_customer(conv) == []


# -- hours ----------------------------------------------------------------------


def test_contact_off_duty_is_skipped_and_the_next_paged_at_once(clock):
    night_only = relay.Contact("Sergio", SERGIO, 120, hours="22:00-06:00")
    conv = start(line(chain=(night_only, BACKUP_C), timezone="America/Los_Angeles"))
    assert [p.to for p in conv.pages] == [BACKUP]
    assert conv.step == 1


def test_contact_on_duty_is_paged(clock):
    day = relay.Contact("Sergio", SERGIO, 120, hours="07:00-22:00")
    conv = start(line(chain=(day, BACKUP_C), timezone="America/Los_Angeles"))
    assert [p.to for p in conv.pages] == [SERGIO]


def test_hours_that_wrap_midnight_count_the_small_hours():
    night = relay.Contact("Night", SERGIO, 60, hours="22:00-06:00")
    with freeze_time("2026-11-27 03:30:00"):
        assert relay.on_duty(night, "UTC", time.time())
    with freeze_time("2026-11-27 12:00:00"):
        assert not relay.on_duty(night, "UTC", time.time())


def test_when_nobody_is_on_duty_the_last_contact_is_paged_anyway(clock):
    morning = relay.Contact("Sergio", SERGIO, 120, hours="06:00-07:00")
    evening = relay.Contact("Backup", BACKUP, 300, hours="23:00-23:30")
    conv = start(line(chain=(morning, evening), timezone="America/Los_Angeles"))
    assert [p.to for p in conv.pages] == [BACKUP]


# -- photos -------------------------------------------------------------------


def test_photos_are_passed_on_with_the_page_and_counted():
    urls = ["https://api.twilio.com/2010-04-01/Accounts/AC1/Messages/MM1/Media/ME1", "https://x.example/ME2"]
    conv = start(line(), body="look at this", media=urls)
    assert conv.pages[0].media == urls
    assert "[2 photos]" in conv.pages[0].body


def test_media_urls_are_read_from_the_webhook_fields():
    params = {"NumMedia": "2", "MediaUrl0": "https://a.example/1", "MediaUrl1": "javascript:alert(1)"}
    assert relay.media_urls(params) == ["https://a.example/1"]
    assert relay.media_urls({"NumMedia": "many"}) == []


# -- config ---------------------------------------------------------------------


def test_templates_may_only_name_line_and_contact():
    with pytest.raises(relay.ConfigError, match=r'line "Q", received_text:'):
        relay.parse_config(
            {
                "lines": [
                    {"name": "Q", "number": LINE, "chain": [{"name": "S", "phone": SERGIO}], "received_text": "{x}"}
                ]
            }
        )


def test_unknown_time_zone_is_refused():
    with pytest.raises(relay.ConfigError, match="time zone"):
        relay.parse_config(
            {
                "lines": [
                    {"name": "Q", "number": LINE, "chain": [{"name": "S", "phone": SERGIO}], "timezone": "Mars/Base"}
                ]
            }
        )


def test_bad_hours_are_refused():
    with pytest.raises(relay.ConfigError, match=r'line "Q", contact "S", hours:'):
        relay.parse_config(
            {"lines": [{"name": "Q", "number": LINE, "chain": [{"name": "S", "phone": SERGIO, "hours": "9-5"}]}]}
        )


# -- end to end -------------------------------------------------------------------

BUSINESS = config_text().replace(
    'name = "QDN"',
    'name = "QDN"\nreply_to_sender = true\nreceived_text = "Thanks, {line} got your text."\n'
    'acknowledged_text = "{contact} is on it."\nunanswered_text = "Nobody could answer; please call."',
)


def test_customer_gets_an_instant_received_answer(start_relay):
    relay_process = start_relay(BUSINESS)
    status, twiml = relay_process.inbound(CUSTOMER, "hello")
    assert status == 200 and "<Message>Thanks, QDN got your text.</Message>" in twiml


def test_a_true_two_way_line_end_to_end(start_relay, fake_twilio):
    relay_process = start_relay(BUSINESS)
    relay_process.inbound(CUSTOMER, "Do you have kayaks at 9?")
    wait_until(lambda: fake_twilio.delivered(SERGIO))
    _, twiml = relay_process.inbound(SERGIO, "#1 yes, two left. See you at 9")
    assert "goes to the customer" in twiml
    to_customer = wait_until(lambda: len(fake_twilio.delivered(CUSTOMER)) == 2 and fake_twilio.delivered(CUSTOMER))
    bodies = [m["Body"] for m in to_customer]
    assert "Sergio is on it." in bodies and "yes, two left. See you at 9" in bodies
    assert all(m["From"] == LINE for m in to_customer)
    assert all(SERGIO not in b and "#1" not in b for b in bodies)
    relay_process.inbound(CUSTOMER, "great, thanks!")
    followups = wait_until(lambda: len(fake_twilio.delivered(SERGIO)) == 2 and fake_twilio.delivered(SERGIO))
    assert "great, thanks!" in followups[1]["Body"]
    relay_process.inbound(SERGIO, "#1")
    barrier(relay_process, fake_twilio)
    assert len(fake_twilio.delivered(CUSTOMER)) == 2  # a bare acknowledgement is not relayed


def test_mms_photos_reach_the_contact(start_relay, fake_twilio):
    relay_process = start_relay(config_text())
    media = "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages/MM1/Media/ME1"
    params = {"MessageSid": msid("mms"), "From": CUSTOMER, "To": LINE, "Body": "broken cleat", "NumMedia": "1"}
    relay_process.post_form("/api/sms/inbound", {**params, "MediaUrl0": media})
    page = wait_until(lambda: fake_twilio.delivered(SERGIO))[0]
    assert page["MediaUrl"] == media and "[1 photo]" in page["Body"]


def test_contact_off_duty_is_skipped_end_to_end(start_relay, fake_twilio):
    later = time.gmtime(time.time() + 2 * 3600)
    much_later = time.gmtime(time.time() + 3 * 3600)
    off_now = f"{later.tm_hour:02d}:00-{much_later.tm_hour:02d}:00"
    config = config_text(primary_wait="1h").replace(
        f'phone = "{SERGIO}", wait = "1h"', f'phone = "{SERGIO}", wait = "1h", hours = "{off_now}"'
    )
    relay_process = start_relay(config)
    relay_process.inbound(CUSTOMER, "anyone?")
    wait_until(lambda: fake_twilio.delivered(BACKUP), timeout=5)
    assert fake_twilio.delivered(SERGIO) == []
    assert relay_process.events("inbound_accepted")[0]["skipped_off_duty"] == 1


def test_customer_is_told_when_nobody_answers_end_to_end(start_relay, fake_twilio):
    config = config_text(primary_wait="1s", backup_wait="1s").replace(
        'name = "QDN"', 'name = "QDN"\nunanswered_text = "Nobody at {line} could answer; please call."'
    )
    relay_process = start_relay(config)
    relay_process.inbound(CUSTOMER, "hello?")
    told = wait_until(lambda: fake_twilio.delivered(CUSTOMER), timeout=10)
    assert [m["Body"] for m in told] == ["Nobody at QDN could answer; please call."]
    assert told[0]["From"] == LINE


@pytest.mark.parametrize(
    ("utc", "on"),
    [("2026-11-27 05:00:00", True), ("2026-11-27 12:00:00", False)],  # 21:00 and 04:00 in Los Angeles
)
def test_contact_hours_are_read_in_the_line_time_zone_not_utc(utc, on):
    day = relay.Contact("Sergio", SERGIO, 120, hours="07:00-22:00")
    with freeze_time(utc):
        assert relay.on_duty(day, "America/Los_Angeles", time.time()) is on


def test_a_two_way_contact_s_later_replies_reach_the_customer_too(tmp_path):
    two_way = line(reply_to_sender=True)
    service = make_relay(tmp_path / "state", relay.Config(lines=(two_way,)))
    service.outbox.senders = RunAtOnce()
    service.receive(
        relay.read_inbound({"MessageSid": msid("c1"), "From": CUSTOMER, "To": LINE, "Body": "kayaks at 9?"})
    )
    service.sweeper.sweep()
    for n, answer in enumerate(["#1 yes, two left", "bring a towel", "see you at the dock"]):
        service.receive(relay.read_inbound({"MessageSid": msid(f"s{n}"), "From": SERGIO, "To": LINE, "Body": answer}))
        service.sweeper.sweep()
    to_customer = [body for _, to, body in service.gateway.sent if to == CUSTOMER]
    assert to_customer == ["yes, two left", "bring a towel", "see you at the dock"]


@pytest.mark.parametrize(
    ("hours", "local", "on"),
    [
        ("07:00-22:00", "06:59", False),
        ("07:00-22:00", "07:00", True),
        ("07:00-22:00", "13:30", True),
        ("07:00-22:00", "21:59", True),
        ("07:00-22:00", "22:00", False),
        # over midnight, the same: on from the first minute, off from the last
        ("22:00-06:00", "21:59", False),
        ("22:00-06:00", "22:00", True),
        ("22:00-06:00", "05:59", True),
        ("22:00-06:00", "06:00", False),
    ],
)
def test_hours_start_at_their_first_minute_and_end_before_their_last(hours, local, on):
    contact = relay.Contact("Sergio", SERGIO, 120, hours=hours)
    with freeze_time(f"2026-11-27 {local}:00"):
        assert relay.on_duty(contact, "UTC", time.time()) is on


def test_escalating_to_an_off_duty_last_contact_pages_them_not_the_first_again(clock):
    always = relay.Contact("Sergio", SERGIO, 120)
    asleep = relay.Contact("Backup", BACKUP, 300, hours="01:00-02:00")
    conv = start(line(chain=(always, asleep), timezone="America/Los_Angeles"))
    clock.tick(120)
    relay.expire(conv, time.time())
    assert [p.to for p in conv.pages] == [SERGIO, BACKUP] and conv.step == 1


def test_a_new_conversation_reads_its_contacts_hours_in_its_line_s_time_zone():
    day = relay.Contact("Sergio", SERGIO, 120, hours="07:00-22:00")
    with freeze_time("2026-11-27 05:00:00"):  # 21:00 in Los Angeles, 05:00 in UTC
        conv = start(line(chain=(day, BACKUP_C), timezone="America/Los_Angeles"))
    assert conv.timezone == "America/Los_Angeles" and [p.to for p in conv.pages] == [SERGIO]
