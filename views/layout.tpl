<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
% if get('refresh'):
<meta http-equiv="refresh" content="{{refresh}}">
% end
<title>{{title}} - relay</title>
<link rel="stylesheet" href="/console.css">
</head>
<body>
<header>
  <strong>relay</strong>
  % if get('me'):
  <nav><a href="/">Overview</a> <a href="/history">History</a> <a href="/schedule">Schedule</a></nav>
  <form method="post" action="/signout" class="inline">
    <input type="hidden" name="csrf" value="{{csrf}}">
    <span class="who">{{me}}</span> <button type="submit">Sign out</button>
  </form>
  % end
</header>
<main>
{{!base}}
</main>
</body>
</html>
