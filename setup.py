"""Packaging for teduo: every field is read from `settings.ini`, the single nbdev 2 config."""
from configparser import ConfigParser
from pathlib import Path
import setuptools

cfg = ConfigParser(delimiters=['='])
cfg.read(Path(__file__).parent/'settings.ini', encoding='utf-8')
c = cfg['DEFAULT']
licenses = {'apache2': ('Apache Software License 2.0', 'OSI Approved :: Apache Software License')}
statuses = ['1 - Planning', '2 - Pre-Alpha', '3 - Alpha', '4 - Beta', '5 - Production/Stable']

setuptools.setup(
    name=c['lib_name'], version=c['version'], description=c['description'],
    long_description=(Path(__file__).parent/'README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    author=c['author'], author_email=c['author_email'], license=licenses[c['license']][0],
    url=c['git_url'], keywords=c['keywords'].split(), python_requires=f">={c['min_python']}",
    classifiers=[f"Development Status :: {statuses[int(c['status']) - 1]}",
                 f"Intended Audience :: {c['audience']}",
                 f"License :: {licenses[c['license']][1]}",
                 f"Natural Language :: {c['language']}",
                 'Programming Language :: Python :: 3'],
    packages=setuptools.find_packages(include=[c['lib_path'], c['lib_path'] + '.*']),
    include_package_data=True,
    install_requires=c['requirements'].split(),
    extras_require={'dev': c['dev_requirements'].split()},
    zip_safe=False,
)
