% rebase('layout', title='Sign in')
<h1>Sign in</h1>
% if said:
<p class="said">{{said}}</p>
% end
% if asked:
<form method="post" action="/signin">
  <input type="hidden" name="phone" value="{{phone}}">
  <label>Code texted to {{phone}} <input name="code" inputmode="numeric" autocomplete="one-time-code" maxlength="6" required></label>
  <button type="submit">Sign in</button>
</form>
<p><a href="/">Use another phone</a></p>
% else:
<form method="post" action="/signin">
  <label>Your phone number <input name="phone" type="tel" autocomplete="tel" placeholder="+16195550111" required></label>
  <button type="submit">Text me a code</button>
</form>
<p>Only a phone on a line's chain or rotation gets a code.</p>
% end
