"""The yardstick: Bottle on waitress, answering every POST with empty TwiML, as the relay is served."""

import os

import bottle
import waitress
from twilio.twiml.messaging_response import MessagingResponse

app = bottle.Bottle()


@app.post("/api/sms/inbound")
def inbound():
    bottle.response.content_type = "text/xml; charset=utf-8"
    return str(MessagingResponse())


if __name__ == "__main__":
    waitress.serve(app, host="127.0.0.1", port=int(os.environ["PORT"]), threads=8, _quiet=True)
